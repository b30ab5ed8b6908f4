"""neuroshield: find, share and train the safety neurons of LLMs and VLLMs."""

__version__ = "0.1.0"
