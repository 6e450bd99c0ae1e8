"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class DfmError(Exception):
    """A problem the user can act on; the message says what to do."""


def reject_unknown_keys(given, known, what: str) -> None:
    """Raise DfmError naming the keys of ``given`` that are not ``known`` (e.g. a typo in a config)."""
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise DfmError(f"unknown {what} {unknown}; valid keys are {sorted(known)}")
