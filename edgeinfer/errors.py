"""One exception tree for everything edgeinfer raises.

::

    EdgeinferError                    base; .hint says what to do next
    ├── InvalidNameError (ValueError) a model name or tag that is not allowed
    ├── ModelNotFoundError (LookupError)
    │                                 not in the store, nor the catalog
    ├── CatalogError                  a catalog entry that cannot be read
    ├── GGUFError (ValueError)        a file that is not a sound GGUF
    ├── StoreError (OSError)          the store cannot be read or written
    ├── DiskSpaceError (OSError)      not enough free disk for a download
    ├── MemoryFitError                a model will not fit in memory
    ├── DownloadError (OSError)       one source failed
    │   ├── ChecksumError             wrong bytes: size or sha256 differ
    │   └── AllSourcesFailedError     every source of an entry failed
    ├── EngineError                   llama.cpp refused or failed
    │   ├── ContextOverflowError      prompt longer than the context
    │   ├── EngineBusyError (TimeoutError)
    │   │                             the queue was full, or did not admit
    │   │                             the request in time
    │   ├── NativeSettingError (ValueError)
    │   │                             an unknown native setting was forced
    │   ├── VocabularyMismatchError (ValueError)
    │                                 a draft model whose tokens differ
    │   └── RpcError                  an RPC worker that cannot be reached or
    │                                 used, or an RPC backend that cannot be built
    ├── QuantizeError                 quantize/convert refused or failed
    │   └── ConvertError (ValueError) a Hugging Face folder the converter
    │                                 cannot turn into GGUF
    ├── CompareError (ValueError)     models that cannot be compared
    ├── TemplateError                 a chat template failed or was hostile
    ├── GrammarError (ValueError)     a JSON schema or grammar that cannot
    │                                 constrain generation
    ├── SpeculativeError (ValueError) a speculative setting that cannot work
    ├── FimUnsupportedError (ValueError)
    │                                 code completion asked of a model with
    │                                 no fill-in-the-middle tokens
    ├── ServerConfigError (ValueError)
    │                                 a server that must not start as asked
    ├── RequestError (ValueError)     a served request's field that is missing,
    │                                 wrong, out of range or not supported
    ├── ModelNotServedError (LookupError)
    │                                 a request for a model the server does not run
    ├── StoppingError                 a new request while the server drains
    └── ServerError                   the server answered with an error
        ├── ServerBusyError (EngineBusyError)
        │                             every sequence taken, queue full
        ├── AuthError (PermissionError)
        │                             missing or wrong token
        └── ConnectionLostError (ConnectionError)
                                      the connection dropped mid-request

Library code raises these; only the CLI turns them into one-line messages.
Each class also inherits the built-in it resembles, so callers may catch
either.
"""

from __future__ import annotations


class EdgeinferError(Exception):
    """Base of every edgeinfer error.

    ``hint`` is one short sentence that tells the user what to do next;
    the CLI prints it after the message.
    """

    hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def one_line(self) -> str:
        msg = str(self).strip().replace("\n", " ")
        return f"{msg} - {self.hint}" if self.hint else msg


class InvalidNameError(EdgeinferError, ValueError):
    """A model name or tag with path separators, ``..`` or odd characters."""

    hint = "use letters, digits, '.', '_' and '-', as in 'smollm2-135m-instruct:q4_1'"


class ModelNotFoundError(EdgeinferError, LookupError):
    """A name that is neither in the store nor in the catalog."""

    hint = "run 'edgeinfer list' to see what is in the store"


class CatalogError(EdgeinferError):
    """A catalog file that is missing fields or cannot be parsed."""


class GGUFError(EdgeinferError, ValueError):
    """A file that is truncated, malformed or not GGUF at all."""

    hint = "the file is damaged or not a GGUF model; download it again"


class StoreError(EdgeinferError, OSError):
    """The model store cannot be read or written."""


class DiskSpaceError(EdgeinferError, OSError):
    """Not enough free disk space for a download or a quantize."""

    hint = "free some space, remove models with 'edgeinfer rm NAME', or set EDGEINFER_HOME to a larger disk"


class MemoryFitError(EdgeinferError):
    """The model plus its KV cache will not fit in available memory."""


class DownloadError(EdgeinferError, OSError):
    """One source could not deliver the file."""


class ChecksumError(DownloadError):
    """A source delivered bytes whose size or sha256 is wrong."""


class AllSourcesFailedError(DownloadError):
    """Every source of a catalog entry failed; ``.errors`` holds each one."""

    def __init__(self, message: str, errors: list[Exception], *, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.errors = errors


class EngineError(EdgeinferError):
    """llama.cpp could not load a model or evaluate a batch."""


class ContextOverflowError(EngineError, ValueError):
    """A prompt that does not fit in the context window."""

    hint = "shorten the prompt or load the model with a larger n_ctx"


class EngineBusyError(EngineError, TimeoutError):
    """The request queue was full, or did not admit the request within the
    engine's ``lock_timeout``."""

    hint = "retry when running generations finish, or cancel them with Engine.cancel()"


class NativeSettingError(EngineError, ValueError):
    """``native=`` or ``$EDGEINFER_NATIVE`` names no native setting."""


class VocabularyMismatchError(EngineError, ValueError):
    """A draft model for speculative decoding whose token ids mean other
    text than the target's."""

    hint = "pick a draft from the target's family, e.g. qwen2.5-coder-0.5b-instruct for the 1.5B"


class RpcError(EngineError):
    """llama.cpp's RPC backend cannot be used: a worker that does not
    answer, answers another protocol or is busy with another client, or a
    backend library that cannot be built here."""

    hint = "start the worker with 'edgeinfer rpc-worker' on the other box (docs/fleet.md)"


class SpeculativeError(EdgeinferError, ValueError):
    """A speculative-decoding setting that cannot work: an unknown mode,
    draft lengths out of range, or ``"draft"`` on an engine loaded without
    a draft model."""

    hint = "choose auto, lookup or off, or load with draft=NAME (--draft MODEL) for draft"


class QuantizeError(EdgeinferError):
    """A quantize or convert that was refused (unknown type, requantizing)
    or that llama.cpp's quantizer failed."""


class ConvertError(QuantizeError, ValueError):
    """A Hugging Face model folder that ``edgeinfer.convert`` refuses: an
    architecture it does not know, or files that are missing or malformed.
    The message names the file or field."""

    hint = ("the converter takes sentence-transformers BERT folders (BertModel: config.json, "
            "tokenizer.json or vocab.txt, model.safetensors); convert others with llama.cpp's "
            "convert_hf_to_gguf.py and run 'edgeinfer import FILE.gguf --name NAME'")


class CompareError(EdgeinferError, ValueError):
    """Models with different vocabularies, or too little evaluation text."""

    hint = "compare quants of one model: they share a tokenizer"


class TemplateError(EdgeinferError):
    """A chat template that failed to render or tried something unsafe."""

    hint = "pass a template of your own with chat_template=..., or use generate() with a plain prompt"


class GrammarError(EdgeinferError, ValueError):
    """A JSON schema the converter cannot turn into a grammar, or a GBNF
    grammar llama.cpp cannot parse; the message says which part."""

    hint = "simplify the schema (docs/python-api.md lists what converts), or pass grammar= in GBNF"


class FimUnsupportedError(EdgeinferError, ValueError):
    """Fill-in-the-middle (a suffix, /infill, Engine.infill) asked of a
    model whose vocabulary has no FIM tokens."""

    hint = "use a coder model: edgeinfer pull qwen2.5-coder-1.5b-instruct"


class ServerConfigError(EdgeinferError, ValueError):
    """``edgeinfer serve`` options that would be unsafe or cannot work,
    such as a non-loopback address without a token."""


class RequestError(EdgeinferError, ValueError):
    """A request field that is missing, of the wrong type, out of range or
    not supported; ``param`` names it in the face's own words."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


class ModelNotServedError(EdgeinferError, LookupError):
    """A request for a model other than the one this server runs."""


class StoppingError(EdgeinferError):
    """A new request while the server drains the ones in flight."""


class ServerError(EdgeinferError):
    """An ``error`` event from the server; ``.code`` is its protocol code
    (see docs/protocol.md)."""

    def __init__(self, message: str, code: str = "internal", *, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.code = code


class ServerBusyError(ServerError, EngineBusyError):
    """The server's sequences are all taken and its queue is full."""

    hint = "retry in a moment, or start the server with a larger --queue"


class AuthError(ServerError, PermissionError):
    """The server wants a token and this one is missing or wrong."""

    hint = "pass the server's token: Client(..., token=...) or EDGEINFER_TOKEN"


class ConnectionLostError(ServerError, ConnectionError):
    """The connection closed before the answer was complete."""

    hint = "check that 'edgeinfer serve' is running, then retry"
