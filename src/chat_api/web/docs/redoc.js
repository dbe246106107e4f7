// ReDoc for /redoc, from this server only (no CDN): the page's CSP allows no other script.
Redoc.init("/openapi.json", { disableSearch: false }, document.getElementById("redoc"));
