"""The one exception a command raises for an expected failure the operator can fix.

The command line turns it into one line on stderr, with a hint, and an exit code; never a
traceback. Server code and the content tools raise it; only `cli` catches it.
"""


class Fatal(Exception):
    def __init__(self, message: str, hint: str = "", exit_code: int = 2):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code

    def __str__(self) -> str:
        # "; hint:" rather than parentheses: a hint may hold parentheses of its own.
        return f"{self.message}; hint: {self.hint}" if self.hint else self.message
