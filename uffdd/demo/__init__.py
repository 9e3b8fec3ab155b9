"""`uffdd demo`: a real lazy restore of a real process, end to end, verified.

The pieces: ``pattern`` says what every byte of the demo's memory must be; ``workload``
is the program that builds that memory (the source) or restores and checks it (the
restored process); ``migration`` runs the whole migration and reports.
"""
