"""User-facing errors: the CLI prints `error: <message>` on one line and exits 2."""


class MinimaError(Exception):
    """A problem with the user's input (paths, shapes, data). Never a bug in minima."""


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
