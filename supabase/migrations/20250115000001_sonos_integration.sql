-- Sonos grants: one row per platform user. Tokens are encrypted by the service
-- (AES-256-GCM, key id in encryption_key_id) before they reach this table; only the
-- service role may read or write it.

begin;

do $$
begin
  if to_regclass('public.sonos_tokens') is not null then
    raise exception 'migration 20250115000001_sonos_integration is already applied: public.sonos_tokens exists';
  end if;
end
$$;

-- Versions come from one sequence, so a version is never reused: not after an
-- update, and not when a revoked (deleted) grant is linked again. A writer that
-- read version N can therefore never overwrite anything but the row it read.
create sequence public.sonos_tokens_version_seq as bigint;

create table public.sonos_tokens (
  user_id                  text        primary key,
  household_id             text        not null,
  household_ids            text[]      not null,
  access_token_encrypted   text,
  refresh_token_encrypted  text,
  encryption_key_id        text        not null,
  expires_at               timestamptz,
  scope                    text        not null default '',
  token_status             text        not null default 'active',
  version                  bigint      not null default nextval('public.sonos_tokens_version_seq'),
  refresh_failure_count    integer     not null default 0,
  last_error_code          text,
  last_refreshed_at        timestamptz,
  created_at               timestamptz not null default now(),
  updated_at               timestamptz not null default now(),

  constraint sonos_tokens_user_id_not_blank check (length(btrim(user_id)) > 0),
  constraint sonos_tokens_household_id_not_blank check (length(btrim(household_id)) > 0),
  constraint sonos_tokens_household_ids_contain_primary
    check (cardinality(household_ids) >= 1 and household_id = any (household_ids)),
  constraint sonos_tokens_key_id_present check (length(btrim(encryption_key_id)) > 0),
  constraint sonos_tokens_status_valid check (token_status in ('active', 'expired', 'revoked')),
  constraint sonos_tokens_version_positive check (version >= 1),
  constraint sonos_tokens_failure_count_non_negative check (refresh_failure_count >= 0),
  constraint sonos_tokens_active_has_tokens check (
    token_status <> 'active'
    or (access_token_encrypted is not null
        and refresh_token_encrypted is not null
        and expires_at is not null)
  )
);

comment on table public.sonos_tokens is
  'Sonos OAuth grants, one per platform user; tokens AES-256-GCM encrypted by the token service.';

-- The background refresher's scan: active grants expiring before a point in time.
create index sonos_tokens_status_expires_at_idx on public.sonos_tokens (token_status, expires_at);

create function public.sonos_tokens_touch() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  if tg_op = 'UPDATE' then
    new.created_at := old.created_at;
  end if;
  new.version := nextval('public.sonos_tokens_version_seq');
  new.updated_at := now();
  return new;
end
$$;

create trigger sonos_tokens_touch
  before insert or update on public.sonos_tokens
  for each row execute function public.sonos_tokens_touch();

-- Row-level security with no policy for anon or authenticated: they see and change
-- nothing. The service role (BYPASSRLS in Supabase) is the only reader and writer.
alter table public.sonos_tokens enable row level security;

revoke all on table public.sonos_tokens from public, anon, authenticated;
revoke all on sequence public.sonos_tokens_version_seq from public, anon, authenticated;
revoke all on function public.sonos_tokens_touch() from public, anon, authenticated;
grant select, insert, update, delete on table public.sonos_tokens to service_role;
grant usage, select on sequence public.sonos_tokens_version_seq to service_role;

commit;
