"""The data path: client connections, exchanges, dispatch to workers, the queue, tunnels."""
