"""The data path: client connections, exchanges, dispatch to workers, worker connections, the queue, tunnels.

One request, in order: client.py (accept, parse, route) -> exchange.py (its life) -> pool.py (which worker:
scheduler.py) -> upstream.py (the worker connection; its response parser calls the exchange) -> exchange.py
(delivery to the client, the slot back, one count and log line: outcomes.py).
"""
