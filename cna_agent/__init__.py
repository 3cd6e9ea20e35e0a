"""cna-agent: the compute node agent for KVM clouds."""

__version__ = "0.1.0"
