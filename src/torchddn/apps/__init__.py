"""The paper's experiments as ``torchddn`` subcommands. Apps use only torchddn's public API."""
