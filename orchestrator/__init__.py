"""Job spec, planner, Ray controller and the `pretrain` CLI."""
