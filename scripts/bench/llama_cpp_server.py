"""`python -m llama_cpp.server` with UniModel's llamacpp engine's extra-buffer rule, for the benchmark peer
and the upstream-engine tests: llama.cpp's extra weight buffer types (AMX, CPU repacks) are off when the
CPU has AMX, on otherwise. llama.cpp's AMX matmul crashes the process (SIGSEGV at the first decode) on
some Sapphire Rapids hosts (llama.cpp issue #20824); both servers then run the same llama.cpp code path.

    python scripts/bench/llama_cpp_server.py --model FILE.gguf --port P ...   # llama_cpp.server's own flags

UNIMODEL_LLAMACPP_EXTRA_BUFFERS=0|1 forces the choice. Runs in any venv with llama-cpp-python[server]
(the peer venv cannot import unimodel, so the rule is restated here: worker/engines/llamacpp.py).
"""

from __future__ import annotations

import os
import runpy
import sys

import llama_cpp
import llama_cpp.llama_cpp as native


def main() -> None:
    setting = os.environ.get("UNIMODEL_LLAMACPP_EXTRA_BUFFERS", "auto")
    if setting == "auto":
        extra = b"AMX_INT8 = 1" not in llama_cpp.llama_print_system_info()
    else:
        extra = setting == "1"
    default = native.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = extra
        return p

    native.llama_model_default_params = params
    print(f"llama_cpp_server: extra buffer types {'on' if extra else 'off'}", file=sys.stderr, flush=True)
    sys.argv = ["llama_cpp.server", *sys.argv[1:]]
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
