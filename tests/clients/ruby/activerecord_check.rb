# Ruby ActiveRecord (pg adapter) through tidepool with its defaults:
# prepared_statements: true (Rails' default), so every query is a named
# prepared statement ("a1", "a2", ...) cached per connection.
#
# Usage: ruby activerecord_check.rb URL THREADS ITERATIONS
#
# THREADS threads share ActiveRecord's connection pool (one connection per
# thread); each runs ITERATIONS rounds of Item.find (checked), an update in a
# transaction and an Event.create!; thread 0 adds a column half way (a schema
# change mid-run: ActiveRecord's cached `SELECT "items".*` then fails once
# with 0A000 and is prepared again, as it would be directly). Finally sums and
# counts are checked. Prints "ruby activerecord: OK ..." and exits 0.

require 'active_record'
require 'uri'

url, threads, iterations = ARGV
threads = threads.to_i
iterations = iterations.to_i
u = URI.parse(url)
ActiveRecord::Base.establish_connection(
  adapter: 'postgresql', host: u.host, port: u.port, database: u.path.delete_prefix('/'),
  username: u.user, password: u.password, prepared_statements: true, pool: threads + 2,
  checkout_timeout: 60
)
ActiveRecord::Base.logger = nil

class Item < ActiveRecord::Base; end
class Event < ActiveRecord::Base; end

begin
  errors = Queue.new
  workers = (0...threads).map do |w|
    Thread.new do
      ActiveRecord::Base.connection_pool.with_connection do
        iterations.times do |i|
          id = (w * 7 + i) % 100 + 1
          item = Item.find(id)
          raise "thread #{w}: find #{id} got #{item.attributes}" unless item.name == "item#{id}"
          Item.transaction do
            n = Item.where(id: id).update_all('qty = qty + 1')
            raise "thread #{w}: update #{id} touched #{n}" unless n == 1
            Event.create!(worker: w, n: i)
          end
          if w.zero? && i == iterations / 2
            ActiveRecord::Base.connection.execute('ALTER TABLE items ADD COLUMN note text')
          end
        end
      end
    rescue StandardError => e
      errors << "thread #{w}: #{e.class}: #{e.message}"
    end
  end
  workers.each(&:join)
  raise errors.pop unless errors.empty?

  want = threads * iterations
  sum = Item.sum(:qty)
  events = Event.count
  raise "sum(qty) #{sum}, events #{events}, want #{want} each" unless sum == want && events == want

  puts "ruby activerecord: OK #{threads} threads x #{iterations} iterations"
rescue StandardError => e
  warn "#{e.class}: #{e.message}"
  exit 1
end
