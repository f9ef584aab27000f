"""What operators see and drive: the admin channel and its answers (routes, status, dashboard), metrics, probes,
systemd, autoscaling."""
