"""edgert tokenize: print the token ids of a text as a Python-style list (llama-tokenize --ids)."""
from __future__ import annotations

from edgert.apps.common import add_model_args, parser


def main(argv) -> int:
    p = parser("tokenize", __doc__)
    add_model_args(p, runtime=False)
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("--no-bos", action="store_true", help="do not add BOS even if the model wants it")
    p.add_argument("--parse-special", action="store_true", help="match control tokens in the text")
    p.add_argument("--show-pieces", action="store_true", help="print id -> piece, one per line")
    args = p.parse_args(argv)
    from edgert.apps.common import model_path
    from edgert.gguf_file import GGUFFile
    from edgert.tokenizer import Tokenizer
    path = model_path(args.model)
    g = GGUFFile(path)
    tok = Tokenizer(g.metadata, path)
    ids = tok.encode(args.prompt, add_special=not args.no_bos, special=args.parse_special)
    if args.show_pieces:
        for i in ids:
            print(f"{i:6d} -> '{tok.token_bytes(i, special=True).decode('utf-8', 'replace')}'")
    else:
        print("[" + ", ".join(str(i) for i in ids) + "]")
    return 0
