"""The worker processes: launch, supervise (a reconcile loop), check health, reload on change."""
