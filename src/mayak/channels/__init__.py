"""Channels: the messengers Mayak hears customers on and speaks to them through (see ``base``)."""
