"""What operators see and drive: the admin channel, status, metrics, probes, systemd, autoscaling."""
