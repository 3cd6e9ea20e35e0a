"""The composition root: the only code that knows every subsystem.

It builds each service with its collaborators as typed constructor arguments (the providers
and VM views of contracts.py), mounts the servicers, and starts and stops everything in
order. No subsystem looks another up by name; to see who talks to whom, read agent.py.
"""

from cna_agent.wiring.agent import Agent, build_agent

__all__ = ["Agent", "build_agent"]
