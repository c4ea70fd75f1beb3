-- Operators (the people running keel) have credentials outside every organisation: operator
-- keys open the `/v1/admin` routes and nothing of any organisation. Same token format and
-- hashing as `api_keys`.
CREATE TABLE operator_keys (
    id          BLOB    PRIMARY KEY NOT NULL,
    name        TEXT    NOT NULL,
    -- The public part of the token, used to find the key; the secret is only kept hashed.
    prefix      TEXT    NOT NULL UNIQUE,
    -- Hex SHA-256 of the whole token.
    token_hash  TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);

-- Organisation keys no longer carry operator power: the `operator` scope is taken out of every
-- key that had it (a key that had only it is left with no scope, and so can do nothing).
UPDATE api_keys
SET scopes = (SELECT json_group_array(value) FROM json_each(api_keys.scopes) WHERE value <> 'operator')
WHERE EXISTS (SELECT 1 FROM json_each(api_keys.scopes) WHERE value = 'operator');
