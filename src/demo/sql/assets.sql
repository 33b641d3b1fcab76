
WITH base AS (
  SELECT n,
         CASE WHEN n % 10 = 0 THEN 'zoe' WHEN n % 10 = 5 THEN 'kenji' ELSE 'admin' END AS who,
         CASE WHEN n % 20 = 7 THEN 'VIDEO' ELSE 'IMAGE' END AS kind,
         (2024 - (n - 1) / 1000)::int AS year
  FROM generate_series(1::bigint, @N@) AS n
), named AS (
  SELECT base.*,
    CASE who WHEN 'admin' THEN '@ADMIN@' WHEN 'zoe' THEN '@ZOE@' ELSE '@KENJI@' END::uuid AS owner,
    make_timestamptz(year, 1, 1, 8, 0, 0, 'UTC') + ((n - 1) % 1000) * interval '8 hours 41 minutes' AS taken,
    '/data/' || CASE
      WHEN who = 'kenji' THEN 'upload/@KENJI@/' || lpad(to_hex(n % 256), 2, '0') || '/'
        || lpad(to_hex((n / 256) % 256), 2, '0') || '/' || lpad(n::text, greatest(8, length(n::text)), '0')
      ELSE 'library/' || who || '/' || year || '/' || CASE kind WHEN 'VIDEO' THEN 'VID_' ELSE 'IMG_' END
        || lpad(n::text, greatest(4, length(n::text)), '0')
    END || CASE kind WHEN 'VIDEO' THEN '.mp4' ELSE '.jpg' END AS path
  FROM base
)
INSERT INTO "asset" ("id", "deviceAssetId", "ownerId", "deviceId", "type", "originalPath",
  "originalFileName", "fileCreatedAt", "fileModifiedAt", "localDateTime", "createdAt", "updatedAt",
  "deletedAt", "isFavorite", "duration", "checksum", "thumbhash", "status", "visibility")
SELECT md5('asset-' || n)::uuid, 'device-asset-' || n, owner,
  CASE who WHEN 'kenji' THEN 'Pixel 8' ELSE 'iPhone 15 Pro' END, kind, path,
  regexp_replace(path, '^.*/', ''), taken, taken + interval '5 minutes', taken + interval '2 hours',
  taken + interval '1 day', taken + interval '1 day',
  CASE WHEN n % 97 = 0 THEN taken + interval '30 days' END,
  n % 9 = 0,
  CASE kind WHEN 'VIDEO' THEN '0:00:12.345000' END,
  substring(sha256(convert_to('content-' || n, 'UTF8')) from 1 for 20),
  CASE WHEN n % 4 = 0 THEN NULL ELSE decode(md5('thumb-' || n), 'hex') END,
  (CASE WHEN n % 97 = 0 THEN 'trashed' ELSE 'active' END)::asset_status_enum,
  (CASE WHEN n % 31 = 0 THEN 'archive' ELSE 'timeline' END)::asset_visibility_enum
FROM named;
