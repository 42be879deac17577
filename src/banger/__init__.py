"""banger: one-command development sandboxes on real microVMs."""

__version__ = "0.1.0.dev0"
