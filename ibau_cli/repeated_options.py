"""Options that take one value are refused when given twice: click would keep the last one silently,
so ``--target 3 --target 7`` gated on class 7 without a word."""

from __future__ import annotations

import click


def refuse_repeated_options(command: click.Command, ctx: click.Context, args: list[str]) -> None:
    """Raise a usage error naming the first one-value option that ``args`` give twice."""
    if ctx.resilient_parsing or any(a in ctx.help_option_names for a in args[: _end(args)]):
        return  # completing a command line, or asking for help: click decides
    takes_value: dict[str, click.Option] = {}
    for param in command.get_params(ctx):
        if isinstance(param, click.Option) and not param.is_flag and not param.count:
            for name in (*param.opts, *param.secondary_opts):
                takes_value[name] = param
    seen: dict[str, tuple[str, str]] = {}
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            break
        name, eq, value = token.partition("=") if token.startswith("--") else (token, "", "")
        param = takes_value.get(name)
        if param is None:
            i += 1
            continue
        if not eq:
            if i + 1 >= len(args):
                return  # no value: click says so in its own words
            value = args[i + 1]
            i += 1  # the value is the next token, whatever it looks like
        i += 1
        if param.multiple:
            continue
        if param.name in seen:
            first_name, first_value = seen[param.name]
            raise click.UsageError(f"{first_name} is given twice ({first_value} and {value}): give it once", ctx=ctx)
        seen[param.name] = (name, value)


def _end(args: list[str]) -> int:
    """Where the options end: at ``--``, or the end."""
    return args.index("--") if "--" in args else len(args)


class OnceCommand(click.Command):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        refuse_repeated_options(self, ctx, args)
        return super().parse_args(ctx, args)


class OnceGroup(click.Group):
    """A group whose commands and sub-groups refuse repeated one-value options (the top-level group
    itself has none: --plugin is repeatable)."""

    command_class = OnceCommand


OnceGroup.group_class = OnceGroup
