"""Helpers for memguard's own tests, benchmarks and demo: real servers on loopback
(:mod:`.servers`), real memory cgroups (:mod:`.cgroups`), large generated bodies
(:mod:`.payloads`). Not part of the installed package."""
