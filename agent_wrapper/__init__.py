"""Runs an agent process and turns its output pipes into a typed stream of events.

Standard library only: this package knows nothing about Redis or the wire format.
"""
