"""Serving on the chunk cache: a model, attention backends behind one cache protocol, a server."""
