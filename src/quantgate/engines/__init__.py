"""Engines: the vLLM server process, emulation, hardware detection and the kernel path."""
