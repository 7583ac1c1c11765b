-- list_children. ARGV[5]: parent id. Returns {id, fields} of each child that
-- exists, in creation order then id; nothing for a missing parent.
local id = ARGV[5]
if redis.call('EXISTS', run_key(id)) == 0 then return {} end
local out = {}
for _, member in ipairs(redis.call('ZRANGE', children_key(id), 0, -1)) do
  local cid = string.sub(member, 19)
  local fields = redis.call('HGETALL', run_key(cid))
  if #fields > 0 then out[#out + 1] = {cid, fields} end
end
return out
