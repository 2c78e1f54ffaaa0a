"""The agenthub edition's hub: a server many autoresearch agents share (see hub/server.py)."""
