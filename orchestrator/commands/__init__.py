"""One module per `pretrain` subcommand: `add_arguments(parser)` and `run(args) -> int`."""
