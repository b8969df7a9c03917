"""One module per `moe-lab` subcommand.

Each module defines `register(subparsers)`, which adds its parser and sets `handler` to a
function taking the parsed args and returning an exit code. Adding a command is adding a module
here and its name to COMMANDS.
"""

COMMANDS = ["train", "config_show", "data", "eval", "upcycle", "convert", "bench", "submit",
            "sweep", "ui", "compare", "tracking"]
