"""The ``compresskit`` command line: a thin layer over :mod:`compresskit.api`.

Defaults come from :class:`compresskit.config.RunConfig`; heavy imports (torch, transformers)
happen inside commands, so ``--help``, ``list``, ``info`` and ``plugins`` stay fast. One module
per command group: :mod:`~compresskit.cli.prune`, :mod:`~compresskit.cli.outputs` (eval, report,
export), :mod:`~compresskit.cli.catalog` (list, info, plugins), :mod:`~compresskit.cli.commands`
(recipe, new-plugin); :mod:`~compresskit.cli.app` builds the group and runs it. Plugins add
commands through the ``register_commands`` hook.
"""

from compresskit.cli.app import cli, main, plugin_args
from compresskit.cli.common import parse_options, registry, use_plugins
from compresskit.cli.prune import prune

__all__ = ["cli", "main", "parse_options", "plugin_args", "prune", "registry", "use_plugins"]
