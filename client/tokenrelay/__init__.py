"""tokenrelay client: generated tokenrelay.v1 stubs plus Client / AsyncClient."""
