"""HTTP routes: thin adapters from each API dialect to the one chat engine."""
