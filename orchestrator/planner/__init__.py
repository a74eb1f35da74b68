"""The planner: parameters, FLOPs, memory per GPU, the layout to run, and scaling-law sizing."""
