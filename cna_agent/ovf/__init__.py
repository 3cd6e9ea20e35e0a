"""OVF 1.x/2.0 descriptors and OVA packages as plain data: read (descriptor.py), written
(writer.py), packed and unpacked (package.py). Nothing here knows the agent: compute's
appliance modules turn these into VM specs and back.
"""
