"""The help formatter of every `nomoat` verb and of `python -m pi_demo`."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after each option, except where the help already says what the
    default is in words ("(default: the bundle's target)", "(0 = off; default: the bundle's, else off)"):
    argparse would add "(default: None)"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and ("(default" in action.help or "default:" in action.help):
            return action.help
        return super()._get_help_string(action)
