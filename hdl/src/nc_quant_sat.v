// Quantiser, fourth stage: saturate to n signed bits: [-lomag, hi] with hi = 2^(n-1)-1 and
// lomag = 2^(n-1), or 2^(n-1)-1 when narrow (both computed once per job by the lane, which
// keeps a shifter off this path). NaN gives 0; infinities saturate.
`default_nettype none
module nc_quant_sat (
    input  wire [1:0]  kind,     // 0: zero, 1: number, 2: NaN, 3: infinity
    input  wire        sign,
    input  wire [16:0] mag,
    input  wire        big,
    input  wire [16:0] hi,
    input  wire [16:0] lomag,
    output reg  [15:0] code,     // two's complement, n significant bits
    output reg         sat
);
    always @(*) begin
        sat = 1'b0;
        code = 16'd0;
        if (kind == 2'd3 || (kind == 2'd1 && big)) begin
            sat = 1'b1;
            code = sign ? (~lomag[15:0] + 16'd1) : hi[15:0];
        end else if (kind == 2'd1) begin
            if (sign) begin
                if (mag > lomag) begin sat = 1'b1; code = ~lomag[15:0] + 16'd1; end
                else code = ~mag[15:0] + 16'd1;
            end else begin
                if (mag > hi) begin sat = 1'b1; code = hi[15:0]; end
                else code = mag[15:0];
            end
        end
    end
endmodule
`default_nettype wire
