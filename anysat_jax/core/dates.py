"""Acquisition dates as the model takes them: day of year, 1-based (1 January = 1), as the
official loaders fed the released weights. No JAX."""

from __future__ import annotations

import datetime
import re

import numpy as np

_DATE = re.compile(r"(\d{4})-?(\d{2})-?(\d{2})")
_MS_PER_DAY = 86_400_000


def day_of_year(value: datetime.date | str | bytes | int) -> int:
  """Day of year (1 January = 1) of a date.

  ``value``: a ``datetime.date`` / ``datetime``, ``"2020-01-02"``, ``"20200102"``, or a name
  that holds such a date (``"S2A_MSIL2A_20200102T102421_..."``: the first one); bytes are
  decoded as UTF-8, ints read as YYYYMMDD. Raises ``ValueError`` naming the value when it
  holds no valid date.
  """
  if isinstance(value, datetime.date):
    return value.timetuple().tm_yday
  text = value.decode() if isinstance(value, bytes) else str(value)
  match = _DATE.search(text)
  if match is None:
    raise ValueError(f"not a date (YYYY-MM-DD, YYYYMMDD or a name holding one): {text!r}")
  try:
    return datetime.date(*map(int, match.groups())).timetuple().tm_yday
  except ValueError as e:
    raise ValueError(f"not a valid date: {text!r} ({e})") from None


def utc_day_of_year(ms: np.ndarray) -> np.ndarray:
  """Milliseconds since the Unix epoch, any shape → int32 day of year of the UTC date."""
  days = (np.asarray(ms, np.int64) // _MS_PER_DAY).astype("datetime64[D]")
  return ((days - days.astype("datetime64[Y]")).astype(np.int64) + 1).astype(np.int32)
