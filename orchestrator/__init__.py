"""dinoray orchestrator: runs the model at scale on Ray."""
