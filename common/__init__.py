"""Plain helpers with no project imports: the bottom layer every other package may use.

Code that runs inside Triton (`serving/`) imports only `client/` and this package.
"""
