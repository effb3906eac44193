"""The upstream transport: aiohttp client, header hygiene, exception mapping at one boundary."""
