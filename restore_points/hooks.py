"""PRE_RESTORE_HOOK and POST_RESTORE_HOOK: the operator's commands around a point restore (stop and start the app).

How a hook runs (its own process group, a time limit, the tail of its output) is common.hooks.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.hooks import HookRun, hook_argv, hook_timeout, run_checked
from common.settings import Settings

NAMES = ("PRE_RESTORE_HOOK", "POST_RESTORE_HOOK")


@dataclass
class Hooks:
    """The two hooks (commands run without a shell, split as a shell would split them) and their time limit."""

    pre: list[str] | None
    post: list[str] | None
    timeout: float

    @classmethod
    def from_settings(cls, settings: Settings) -> Hooks:
        """Read and check both hooks (see common.hooks.hook_argv), so that a typo stops the restore before its
        first change, not after the configuration and code are back."""
        return cls(hook_argv(settings, NAMES[0]), hook_argv(settings, NAMES[1]), hook_timeout(settings))

    def run(self, name: str, consequence: str) -> HookRun | None:
        """Run one hook (None when it is not set); a failure or a hook that hangs raises a line saying where
        the restore stands, with the end of the hook's output."""
        argv = self.pre if name == NAMES[0] else self.post
        if argv is None:
            return None
        return run_checked(name, argv, self.timeout, consequence)
