"""`alga-bootstrap completion bash|zsh`: shell completion scripts, generated from the
command line parser so they never fall behind it."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

# A context as kubectl lists it; the agent reads kubeconfig files by the same rules.
_CONTEXTS = "kubectl config get-contexts -o name 2>/dev/null"


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help(parser: argparse.ArgumentParser, name: str) -> str:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                if choice.dest == name:
                    return choice.help or ""
    return ""


def _value_kind(action: argparse.Action) -> str:
    """What an option's value is: a file, one of its choices, a context, or free text."""
    if action.type is Path:
        return "file"
    if action.choices:
        return " ".join(str(c) for c in action.choices)
    return "context" if action.dest == "context" else "text"


def _bash(parser: argparse.ArgumentParser) -> str:
    commands = _commands(parser)
    values: dict[str, str] = {}  # an option that takes a value: its kind
    words: dict[str, str] = {}
    for name, cmd in commands.items():
        options: list[str] = []
        positional = ""
        for action in cmd._actions:
            options += action.option_strings
            if action.option_strings and action.nargs != 0:
                for option in action.option_strings:
                    values[option] = _value_kind(action)
            elif not action.option_strings and action.choices:
                positional = " ".join(str(c) for c in action.choices)
        words[name] = f"{positional} {' '.join(options)}".strip()
    value_cases = []
    for kind in sorted(set(values.values())):
        pattern = "|".join(sorted(o for o, k in values.items() if k == kind))
        reply = {
            "file": "return 0",  # `complete -o default` offers file names
            "text": "return 0",
            "context": f'COMPREPLY=($(compgen -W "$({_CONTEXTS})" -- "$cur")); return 0',
        }.get(kind, f'COMPREPLY=($(compgen -W "{kind}" -- "$cur")); return 0')
        value_cases.append(f"        {pattern}) {reply} ;;")
    command_cases = [
        f'        {name}) COMPREPLY=($(compgen -W "{w}" -- "$cur")) ;;' for name, w in words.items()
    ]
    return "\n".join(
        [
            "# bash completion for alga-bootstrap: source it, or put it in",
            "# /etc/bash_completion.d/alga-bootstrap",
            "_alga_bootstrap() {",
            '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"',
            '    local cmd="" i',
            "    for ((i = 1; i < COMP_CWORD; i++)); do",
            '        case "${COMP_WORDS[i]}" in -*) ;; *) cmd="${COMP_WORDS[i]}"; break ;; esac',
            "    done",
            '    case "$prev" in',
            *value_cases,
            "    esac",
            '    case "$cmd" in',
            f'        "") COMPREPLY=($(compgen -W "{" ".join(commands)} --help" -- "$cur")) ;;',
            *command_cases,
            "    esac",
            "}",
            "complete -o default -F _alga_bootstrap alga-bootstrap",
        ]
    )


def _zsh_text(text: str) -> str:
    """Help text fit for an _arguments spec inside single quotes: its first clause."""
    clause = re.split(r"[(;]", text)[0].strip()
    return re.sub(r"[\[\]'`$\\:]", "", clause)


def _zsh(parser: argparse.ArgumentParser) -> str:
    commands = _commands(parser)
    describe = " ".join(f"'{n}:{_zsh_text(_help(parser, n))}'" for n in commands)
    cases = []
    for name, cmd in commands.items():
        specs = []
        for action in cmd._actions:
            what = _zsh_text(action.help or action.dest)
            if not action.option_strings:
                choices = " ".join(str(c) for c in action.choices or [])
                specs.append(f"'1:{action.dest}:({choices})'")
                continue
            kind = _value_kind(action) if action.nargs != 0 else ""
            value = {
                "": "",
                "file": ":file:_files",
                "text": f":{action.dest}:",
                "context": ":context:_alga_bootstrap_contexts",
            }.get(kind, f":{action.dest}:({kind})")
            names = action.option_strings
            if len(names) == 1:
                specs.append(f"'{names[0]}[{what}]{value}'")
            else:  # exclusive aliases: '(-o --output)'{-o,--output}'[...]'
                specs.append(f"'({' '.join(names)})'{{{','.join(names)}}}'[{what}]{value}'")
        cases.append(f"    {name}) _arguments {' '.join(specs)} ;;")
    return "\n".join(
        [
            "#compdef alga-bootstrap",
            "# zsh completion for alga-bootstrap: save as _alga-bootstrap in a directory on",
            "# $fpath (before compinit), or source it after compinit",
            "_alga_bootstrap_contexts() {",
            f'  local -a contexts; contexts=(${{(f)"$({_CONTEXTS})"}})',
            "  _describe context contexts",
            "}",
            "_alga-bootstrap() {",
            "  local curcontext=$curcontext state line",
            "  _arguments -C '1:command:->command' '*::argument:->argument'",
            "  case $state in",
            f"  command) local -a commands; commands=({describe}); _describe command commands ;;",
            "  argument)",
            "    case $line[1] in",
            *cases,
            "    esac ;;",
            "  esac",
            "}",
            'if [ "$funcstack[1]" = "_alga-bootstrap" ]; then',
            '  _alga-bootstrap "$@"',
            "else",
            "  compdef _alga-bootstrap alga-bootstrap",
            "fi",
        ]
    )


def script(shell: str, parser: argparse.ArgumentParser) -> str:
    return _bash(parser) if shell == "bash" else _zsh(parser)
