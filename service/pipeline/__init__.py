"""The sync loop and its collaborators: the asyncio edge that drives the pure core."""
