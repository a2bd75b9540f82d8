"""alga-bootstrap: the first-boot agent that hands a Talos appliance over to Flux."""

__version__ = "0.1.0"
