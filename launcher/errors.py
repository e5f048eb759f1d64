"""Errors a user can cause. The CLI prints them as one line and exits 2; anything else is a bug."""


class UserError(Exception):
    """A mistake the user can fix: bad recipe, bad override, bad environment."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class RecipeError(UserError):
    """Something in the recipe or its overrides is wrong: `key` is the dotted path."""


class LaunchError(UserError):
    """The environment the launcher was started in is wrong: `key` names the variable or option."""


class ArgumentError(Exception):
    """Raised by a built-in component about one of its own arguments; `instantiate` reports it as a
    RecipeError for the argument's recipe key (the component does not know where the recipe put it)."""

    def __init__(self, argument: str, message: str | None = None):
        if message is None:  # rebuilt by torch from a DataLoader worker's traceback text
            argument, message = _from_worker_traceback(argument)
        super().__init__(message)
        self.argument = argument
        if hasattr(self, "add_note"):  # Python >= 3.11: the argument rides in the traceback text too
            self.add_note(f"{_ARGUMENT_NOTE}{argument}")


_ARGUMENT_NOTE = "launcher argument: "


def _from_worker_traceback(text: str) -> tuple[str, str]:
    """(argument, message) from torch's "Caught ArgumentError in DataLoader worker process N.
    Original Traceback ..." text: the exception's own line and its note."""
    lines = text.splitlines()
    header = f"{__name__}.ArgumentError: "
    message = next((line[len(header) :] for line in reversed(lines) if line.startswith(header)), text)
    argument = next((line[len(_ARGUMENT_NOTE) :] for line in lines if line.startswith(_ARGUMENT_NOTE)), "")
    return argument, message


def positive(argument: str, value: int | None, optional: bool = True) -> int | None:
    """A length or count argument: a whole number of at least 1 (or None where `optional`)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ArgumentError(argument, f"{value!r} is not a length: give a whole number of at least 1")
    return value


class DataRowError(Exception):
    """A data source's ArgumentError (a bad row) met while the loop read a split: `key` is the
    split's recipe key (data.train or data.val), which the source itself does not know."""

    def __init__(self, key: str, error: ArgumentError):
        super().__init__(str(error))
        self.key = key
        self.error = error


class MissingFile(ArgumentError, FileNotFoundError):
    """A component's input file does not exist: `launcher check` accepts that for data that lives
    only where the run will run; `launcher run` stops on it."""


class BuildError(RecipeError):
    """A component's constructor raised; `cause` is what it raised."""

    def __init__(self, key: str, message: str, cause: BaseException):
        super().__init__(key, message)
        self.cause = cause


class TrainingError(Exception):
    """The run cannot go on (non-finite loss, a hung rank): one line, exit code 1, no traceback."""


class Preempted(Exception):
    """A preemption signal was honoured: a checkpoint is saved; exit with `exit_code` to be requeued."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# exit codes: success, anything else, a user error (one line on stderr)
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
