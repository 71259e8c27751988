"""Generated protocol modules for bnservice.v1 (see scripts/gen_protos.py)."""
