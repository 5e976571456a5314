"""The server's connection protocols: HTTP/1.1 (uvicorn's) and HTTP/2 on the same port."""
