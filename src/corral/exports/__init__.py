"""Configuration for the engines users already run: nginx, HAProxy, systemd, Kubernetes."""
