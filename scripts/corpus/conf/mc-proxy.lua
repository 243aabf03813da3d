-- memcached 1.6.18 proxy config (corpus): every command goes to one backend on
-- 127.0.0.1:11400 (a plain memcached started beside the proxy).
function mcp_config_pools(oldss)
    local b1 = mcp.backend('b1', '127.0.0.1', 11400)
    return mcp.pool({b1})
end

function mcp_config_routes(pool)
    mcp.attach(mcp.CMD_ANY_STORAGE, function(r) return pool(r) end)
end
