"""Errors btfast raises for inputs and models it cannot serve: each message names the problem."""


class BtfastError(ValueError):
    """Base class: a bad input or an unsupported model, with a message that says which."""


class UnsupportedModelError(BtfastError):
    """The model (or its config) is not one btfast can run exactly."""


class InputError(BtfastError):
    """A call's inputs do not fit the model (shapes, lengths, batch sizes, unsupported arguments)."""
