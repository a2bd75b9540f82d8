"""One module per step of the boot, called in order by agent.run."""
