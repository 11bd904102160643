"""Native (C) kernels of smsrepl; import them through :mod:`smsrepl.kernels`."""
